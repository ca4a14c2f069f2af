# expect: passed
# Sends UDP datagrams to a port the test listens on: none may arrive.
import socket

with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    for _ in range(10):
        try:
            s.sendto(b"@@MARKER@@", ("127.0.0.1", int("@@UDP_PORT@@")))
        except OSError:
            pass
