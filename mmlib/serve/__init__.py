"""Serving: the daemon (daemon) that owns the vLLM servers, each one's life as a state machine
(states, supervisor), which of them are awake (scheduler), the stable OpenAI endpoint (proxy), the
API-key check (auth), the CLI's side of the control socket (client), what mm measures (metrics, in
Prometheus form; events, the recent ones for the page) and the live page at the proxy's root (page).

Imports guard, profiles and system; never measure or the CLI.
"""
