# expect: timeout
# Ignores every catchable signal; the worker uses SIGKILL.
import signal

for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGXCPU, signal.SIGALRM, signal.SIGUSR1):
    signal.signal(sig, signal.SIG_IGN)
while True:
    pass
