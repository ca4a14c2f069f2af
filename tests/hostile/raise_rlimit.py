# expect: failed
# error: ValueError
import resource

resource.setrlimit(resource.RLIMIT_NPROC, (100_000, 100_000))
