"""Request and response bodies of the HTTP API, a module per resource, kept apart from
the domain and storage.

``common`` holds what every resource shares (ids, request base, pages, bounded JSON),
``money`` the token strings, ``commands`` a command's answer; then ``agents``,
``tasks``, ``accounts``, ``economy``, ``proposals``, ``workflows``, ``runs``,
``templates``, ``events`` (CloudEvents), ``deadletters`` and ``health``.

A request body is not its command (money is a token string here), but it shares the
command's field types: a bound or default is declared once, next to the command in
domain/ (``domain.task.LeaseTimeoutS`` and ``DEFAULT_LEASE_TIMEOUT_S``), and both use it.
The bounds written here are the HTTP API's own: ids safe in a URL path, JSON size, batch
and list lengths, token strings.
"""
