# expect: timeout
# A fork bomb (posix.fork gets around the guard's os.fork = None). The job runs as an
# unprivileged uid, so RLIMIT_NPROC stops it at max_processes; the rest is killed at the limit.
import posix

while True:
    try:
        posix.fork()
    except OSError:
        pass
