# expect: passed
# Leaves a deep tree of directories it locked (mode 000) for the worker to clean up.
import os
import posix

path = "."
for i in range(500):
    path = os.path.join(path, f"d{i}")
    posix.mkdir(path)
with open(os.path.join(path, "f"), "w") as f:
    f.write("x")
posix.chmod(path, 0)
posix.chmod("d0", 0)
os.symlink("/etc", "etc-link")
