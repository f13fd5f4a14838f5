from runners.boundary_diffusion import BoundaryDiffusion

__all__ = ["BoundaryDiffusion"]
