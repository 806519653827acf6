"""Private helpers of the mesh library. Nothing here is public API: import from `mesh` (or
`mesh.testing`) instead; these modules may change without notice."""
