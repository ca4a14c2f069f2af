# expect: failed
# error: PermissionError
import posix
import signal

posix.kill(1, signal.SIGKILL)
