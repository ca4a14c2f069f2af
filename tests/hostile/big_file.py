# expect: failed
# error: OSError
# Writes a file larger than RLIMIT_FSIZE / the sandbox's /tmp.
with open("big", "wb") as f:
    for _ in range(1000):
        f.write(b"\0" * (1 << 20))
