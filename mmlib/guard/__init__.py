"""Guard rails: a profile checked against the installed vLLM and this machine before it starts.
Known bad combinations as data (rules), what a model is from its files (modelinfo), whether it fits
the card (fit), the checks that put them together (checks), the machine's readiness (doctor) and a
failed server's log matched against known failures (diagnose).

Imports profiles and system; never serve, measure or the CLI.
"""
