# expect: passed
# Looks for the host's (fake) secret in the environment and in /proc; prints what it finds.
import os

print(dict(os.environ))
found = [k for k, v in os.environ.items() if "@@SECRET@@" in v]
for path in ("/proc/self/environ", "/proc/1/environ", f"/proc/{os.getppid()}/environ"):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        continue
    print(path, data)
    if b"@@SECRET@@" in data:
        found.append(path)
assert not found, found
