"""The fake's engine core: only what mm reads of vLLM's own code without importing it.

mm asks the installed vLLM whether a sleep can keep the requests in flight (vLLM 0.26+: the scheduler
is paused with PauseState.PAUSED_ALL, the running requests are preempted with
reset_prefix_cache(reset_running_requests=True) and resume after wake_up). The fake's HTTP server
(vllm/entrypoints/cli/main.py) behaves that way for /sleep?mode=keep.
"""


class PauseState:
    UNPAUSED = 0
    PAUSED_NEW = 1
    PAUSED_ALL = 2


class EngineCore:
    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        """mode="keep": PauseState.PAUSED_ALL, then _reset_caches(reset_running_requests=True)."""
