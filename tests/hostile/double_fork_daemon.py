# expect: passed
# The classic daemon: fork, setsid, fork again, exec a long sleep under a marked name.
import os
import posix

if posix.fork() == 0:
    os.setsid()
    if posix.fork() == 0:
        os.execv("/bin/sleep", ["@@MARKER@@-daemon", "30"])
    os._exit(0)
