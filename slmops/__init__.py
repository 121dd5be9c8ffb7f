"""The slmops command line: wires protocol, agent, fleet and trainer together, loading each lazily."""
