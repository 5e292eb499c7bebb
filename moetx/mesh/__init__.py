"""Layer 2, the mesh: named device-mesh axes built from degrees (`ParallelMesh`, `MeshDegrees`)."""

from moetx.mesh.parallel_mesh import MeshDegrees, ParallelMesh, as_parallel_mesh

__all__ = ["MeshDegrees", "ParallelMesh", "as_parallel_mesh"]
