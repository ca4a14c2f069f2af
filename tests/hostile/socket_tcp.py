# expect: passed
# Connects to a TCP port the test listens on at 127.0.0.1: the sandbox has its own loopback.
import socket

assert [name for _, name in socket.if_nameindex()] == ["lo"], socket.if_nameindex()
connected = False
try:
    with socket.create_connection(("127.0.0.1", int("@@PORT@@")), timeout=0.5):
        connected = True
except OSError:
    pass
assert not connected
