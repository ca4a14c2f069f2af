"""The sandbox that runs model-written code: a pool of bwrap-isolated workers (``engine``) and the
worker program they run (``worker``). Fails closed: no bubblewrap, no run, unless the config asks
for rlimits-only isolation explicitly. Builds on `pipeline.core` only.

    python -c "from pipeline.sandbox import Job, Sandbox; \\
print(Sandbox().__enter__().run([Job('x = 1', test='assert x == 1')]))"
"""

from pipeline.core.config import SandboxConfig
from pipeline.sandbox.engine import Job, Sandbox, SandboxUnavailable, Verdict, run_jobs

__all__ = ["Job", "Sandbox", "SandboxConfig", "SandboxUnavailable", "Verdict", "run_jobs"]
