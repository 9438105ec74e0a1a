"""Request and response bodies of the HTTP API, a module per resource, kept apart from
the domain and storage.

``common`` holds what every resource shares (ids, request base, pages, bounded JSON),
``money`` the token strings, ``commands`` a command's answer; then ``agents``,
``tasks``, ``accounts``, ``economy``, ``proposals``, ``workflows``, ``runs``,
``templates``, ``events`` (CloudEvents), ``deadletters`` and ``health``.
"""
