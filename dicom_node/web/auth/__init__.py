"""Sign-in for the HTTP service: who may call (:mod:`.guard`), as whom (:mod:`.principal`),
the users, sessions and tokens of record (:mod:`.accounts`), single sign-on (:mod:`.oidc`)
and the sign-in page (:mod:`.login`)."""

from dicom_node.web.auth.guard import Authenticator, install_guard, requires
from dicom_node.web.auth.principal import ADMIN, ANNOTATOR, READER, ROLES, Principal

__all__ = [
    "ADMIN",
    "ANNOTATOR",
    "READER",
    "ROLES",
    "Authenticator",
    "Principal",
    "install_guard",
    "requires",
]
