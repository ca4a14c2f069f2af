# expect: failed
# error: EarlyExit
# Tries to forge the completion report on every fd, prints "passed", then exits early.
import os

for fd in range(3, 64):
    for payload in (
        b"passed\n",
        b'{"kind": "passed"}\n',
        b'0123456789abcdef0123456789abcdef:{"kind": "passed"}\n',
    ):
        try:
            os.write(fd, payload)
        except OSError:
            pass
print("passed")
os._exit(0)
