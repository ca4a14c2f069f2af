# expect: passed
# Tries to create files outside its own directory: the test's tmp dir, the repo, the host's
# home, /tmp, /var/tmp, /dev/shm, /etc. Asserts that every attempt failed.
import os

targets = [
    "@@CANARY_DIR@@/created-by-job",
    "@@REPO@@/created-by-job-@@MARKER@@",
    os.path.expanduser("~root") + "/created-by-job-@@MARKER@@",
    "/tmp/created-by-job-@@MARKER@@",
    "/var/tmp/created-by-job-@@MARKER@@",
    "/dev/shm/created-by-job-@@MARKER@@",
    "/etc/created-by-job-@@MARKER@@",
]
created = []
for path in targets:
    try:
        with open(path, "w") as f:
            f.write("pwned")
        created.append(path)
    except OSError:
        pass
assert not created, created
