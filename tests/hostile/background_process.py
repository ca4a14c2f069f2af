# expect: passed
# Starts a long-lived process in a new session that would write a file later, and returns.
import subprocess

script = "sleep 3; echo late > @@CANARY_DIR@@/late; : @@MARKER@@"
subprocess.Popen(["/bin/sh", "-c", script], start_new_session=True)
