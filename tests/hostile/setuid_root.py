# expect: failed
# error: PermissionError
import posix

posix.setuid(0)
