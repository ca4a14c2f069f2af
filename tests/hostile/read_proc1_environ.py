# expect: failed
# error: PermissionError
# pid 1 of the sandbox is bwrap's init, running as root: its environ is not ours to read.
with open("/proc/1/environ", "rb") as f:
    print(f.read())
