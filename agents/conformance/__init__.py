"""A2A conformance agent: the A2A TCK's scenarios (`tck-*` messageIds) on the mesh's runtime."""
