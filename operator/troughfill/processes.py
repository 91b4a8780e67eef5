"""Child processes that must stop with everything they started."""

import contextlib
import os
import signal
import subprocess


def stop_process_group(process: "subprocess.Popen[bytes]", timeout: float) -> None:
    """SIGTERM the child's process group, SIGKILL it after `timeout`; a no-op once it has exited.

    The child must have been started with `start_new_session=True` (its own group), so that
    whatever it spawned (vLLM's engine core and workers, say) stops with it.
    """
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
