"""The in-process app fixtures of the API tests."""

from tests.api.conftest import (  # noqa: F401
    _answers_are_complete,
    db_path,
    make_client,
    settings,
    template_db,
)
