"""The face front end: decode/encode, detection and landmarks, alignment,
classical covers and the independent identity verifier. Knows pixels only."""

from .align import AlignedFace, align_face, arcface_crop, arcface_five_points, face_region_mask, paste_back
from .classical import CLASSICAL_METHODS, apply_classical, cover_region
from .detect import DetectedFace, DetectorUnavailableError, FaceDetector
from .image_io import DecodedImage, decode_image, encode_image
from .verify import SAME_PERSON_THRESHOLD, DlibVerifier

__all__ = [
    "AlignedFace",
    "CLASSICAL_METHODS",
    "DecodedImage",
    "DetectedFace",
    "DetectorUnavailableError",
    "DlibVerifier",
    "FaceDetector",
    "SAME_PERSON_THRESHOLD",
    "align_face",
    "apply_classical",
    "arcface_crop",
    "arcface_five_points",
    "cover_region",
    "decode_image",
    "encode_image",
    "face_region_mask",
    "paste_back",
]
