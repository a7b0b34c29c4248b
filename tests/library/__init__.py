"""Tests of the library, one file per module."""
