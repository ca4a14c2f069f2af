# expect: passed
# A child leaves the job's process group (setsid) and keeps running a marked shell loop.
import os
import posix

if posix.fork() == 0:
    os.setsid()
    os.execv("/bin/sh", ["/bin/sh", "-c", "while :; do sleep 1; done; : @@MARKER@@"])
