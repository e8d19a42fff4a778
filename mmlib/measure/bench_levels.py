"""Helper process for `mm bench --sweep` (imports vLLM, so the CLI never does): `vllm bench serve`
once per line of stdin, all in this one process, so that a sweep pays vLLM's import (20-40 s on a
CPU, 10 s or more on a GPU machine) once rather than once per level.

    python -m mmlib.measure.bench_levels < jobs

Each line is {"argv": [what follows `vllm bench serve`], "done": PATH}; when the run ends PATH is
written (atomically) with "0", or a line saying why it failed. EOF ends the helper.
"""
from __future__ import annotations

import json
import os
import sys
import traceback


def run_one(argv: list[str]) -> str:
    from vllm.entrypoints.cli.main import main as vllm_main  # vLLM's own CLI, as `vllm bench serve` runs it

    sys.argv = ["vllm", "bench", "serve", *argv]
    try:
        vllm_main()
    except SystemExit as e:  # argparse's refusal, or vLLM's own exit
        return "0" if e.code in (0, None) else f"exit {e.code}"
    except Exception as e:  # noqa: BLE001 - one failed level is reported, the helper stays for the next
        traceback.print_exc()
        return f"{type(e).__name__}: {e}"
    return "0"


def main() -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        status = run_one(job["argv"])
        sys.stdout.flush()
        sys.stderr.flush()
        tmp = f"{job['done']}.tmp"
        with open(tmp, "w") as f:
            f.write(" ".join(status.split())[:500] + "\n")
        os.replace(tmp, job["done"])


if __name__ == "__main__":
    main()
