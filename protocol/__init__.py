"""The slmops contract: bundle manifest, trust, topics, messages and errors.

Pure: no sockets, no files, no clock it does not receive. Every other package imports it; it imports none of them.
"""
