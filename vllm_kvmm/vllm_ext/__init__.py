"""Everything that imports vLLM: plugin, spec and manager, grouping, backend, connector, patches."""
