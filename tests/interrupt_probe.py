"""Helper of tests/cli/test_cli.py: interrupt `test.py`'s job at several moments, paying torch's import once.

    PYTHONPATH=tests python -m interrupt_probe DELAY[,DELAY...] NTH_CLASS -- <test.py arguments>

Imports the evaluation job once, then per delay forks a child in its own session that runs exactly what
`test.py` runs (`fdsl.cli.jobs.main(TestConfig, "fdsl.engine.evaluation:evaluate", argv)`), waits until the child logs
that its NTH_CLASS-th class's dataset is built (its DataLoader workers start right then), sleeps DELAY
seconds and sends SIGINT to the child's process group, as Ctrl-C in a terminal does. Each trial writes to
its own folder, `--save_path` plus `_<trial index>`. Prints one JSON line per delay: {"delay", "rc", "stderr"}.
"""
import json
import os
import signal
import sys
import time

import fdsl.engine.evaluation  # noqa: F401  (the slow import, done once)
from fdsl.cli.jobs import main
from fdsl.config import TestConfig


def trial(delay: float, nth: int, argv: list) -> dict:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: test.py's job in a new session, stderr into the pipe
        os.setsid()
        os.close(r)
        os.dup2(w, 2)
        code = main(TestConfig, "fdsl.engine.evaluation:evaluate", argv)
        sys.stderr.flush()
        os._exit(code)
    os.close(w)
    out = []
    with os.fdopen(r, "r") as fh:
        seen = 0
        for line in fh:
            out.append(line)
            if "INFO fdsl.data.datasets: AnomalyDataset" in line:
                seen += 1
                if seen == nth:
                    time.sleep(delay)
                    os.killpg(pid, signal.SIGINT)
                    break
        out.append(fh.read())
    _, status = os.waitpid(pid, 0)
    return {"delay": delay, "rc": os.waitstatus_to_exitcode(status), "stderr": "".join(out)}


if __name__ == "__main__":
    delays = [float(d) for d in sys.argv[1].split(",")]
    nth = int(sys.argv[2])
    argv = sys.argv[sys.argv.index("--") + 1:]
    at = argv.index("--save_path") + 1
    for i, d in enumerate(delays):
        run_argv = argv[:at] + [f"{argv[at]}_{i}"] + argv[at + 1:]
        print(json.dumps(trial(d, nth, run_argv)), flush=True)
