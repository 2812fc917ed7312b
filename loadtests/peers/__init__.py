"""Peer servers that `make bench` compares the service with (mosec, LitServe, PyTriton), each
doing the same work per request as the service: loadtests/peers/work.py."""
