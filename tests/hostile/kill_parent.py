# expect: failed
# error: PermissionError
# The worker (our parent) and bwrap's init run as root: an unprivileged job may not signal them.
import os
import posix
import signal

posix.kill(os.getppid(), signal.SIGKILL)
