# expect: signal
import posix
import signal

posix.killpg(0, signal.SIGKILL)
