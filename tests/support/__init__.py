"""Test support code: a byte-exact fake provider upstream and a raw HTTP/1.1 client."""
