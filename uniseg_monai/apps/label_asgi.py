"""The ASGI app ``uniseg label-server`` runs: MONAI Label's FastAPI app (``monailabel.app:app``) answering a bad
request with 4xx and one line (``{"detail": ...}``) instead of a 500: a user error of this package (unknown task,
an image with the wrong channel count, training without labels: 400) and MONAI Label's invalid-input errors (unknown
model or image: 404); a DICOMweb server that fails or cannot be reached answers 502."""

from __future__ import annotations

import requests
from fastapi import Request
from fastapi.responses import JSONResponse

from uniseg_monai.apps.label_server import monailabel_imports
from uniseg_monai.core.errors import one_line, user_error

monailabel_imports()

from monailabel.app import app  # noqa: E402
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException  # noqa: E402


def _invalid_input(err: BaseException | None) -> MONAILabelException | None:
    """The MONAI Label invalid-input error behind ``err``, if any."""
    while err is not None:
        if isinstance(err, MONAILabelException) and err.error == MONAILabelError.INVALID_INPUT:
            return err
        err = err.__cause__ or err.__context__
    return None


async def _bad_request(request: Request, err: Exception) -> JSONResponse:
    """4xx with the message for a bad request, 502 for a failing DICOMweb server; other errors stay 500, with one
    line and no traceback."""
    if isinstance(err, requests.RequestException):  # an OSError, but not the user's
        return JSONResponse({"detail": f"the DICOMweb server failed: {one_line(err)}"}, status_code=502)
    cause = user_error(err)
    if cause is not None:
        return JSONResponse({"detail": one_line(cause)}, status_code=400)
    invalid = _invalid_input(err)
    if invalid is not None:
        return JSONResponse({"detail": invalid.msg}, status_code=404)
    return JSONResponse({"detail": f"{type(err).__name__}: {one_line(err)}"}, status_code=500)


app.add_exception_handler(Exception, _bad_request)
