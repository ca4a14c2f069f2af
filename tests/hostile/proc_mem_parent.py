# expect: failed
# error: PermissionError
# Tries to write into the worker's memory.
import os

with open(f"/proc/{os.getppid()}/mem", "wb") as f:
    f.write(b"pwned")
