# expect: passed
# The host's home and the project are hidden: only the Python installation shows through.
import os

secrets = ["@@REPO@@/pyproject.toml", "@@REPO_CANARY@@", "/root/.bashrc", "/root/.gitconfig", "/root/.cache"]
readable = [p for p in secrets if os.path.exists(p)]
assert not readable, readable
print(os.listdir("@@REPO@@"), os.listdir("/root"))
