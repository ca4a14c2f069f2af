# expect: passed
# Tries to delete or overwrite files it does not own: the test's canary file, a canary in the
# repo, the repo's pyproject.toml. Asserts that every attempt failed.
import posix
import shutil

damaged = []
for path in ("@@CANARY_FILE@@", "@@REPO_CANARY@@", "@@REPO@@/pyproject.toml"):
    try:
        posix.unlink(path)
        damaged.append(path)
    except OSError:
        pass
    try:
        with open(path, "a") as f:
            f.write("pwned")
        damaged.append(path)
    except OSError:
        pass
try:
    shutil.rmtree("@@CANARY_DIR@@")
    damaged.append("@@CANARY_DIR@@")
except OSError:
    pass
assert not damaged, damaged
