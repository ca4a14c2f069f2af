# expect: signal
import os

os.abort()
