"""Serving: the daemon (daemon) that owns the vLLM servers, each one's life as a state machine
(states, supervisor), which of them are awake (scheduler), the stable OpenAI endpoint (proxy), the
API-key check (auth), and the CLI's side of the control socket (client).

Imports guard, profiles and system; never measure or the CLI.
"""
