"""What the tests import: loopback servers in processes of their own, leak checks."""
