"""OIDC identity: a token as the password, mapped to a PostgreSQL role the gateway logs in as.

The pieces, one idea per module:

* :mod:`~pgwarden.identity.discovery` finds an issuer's JWKS through OIDC discovery;
* :mod:`~pgwarden.identity.jwks` caches its keys, with rotation and rate-limited refreshes;
* :mod:`~pgwarden.identity.tokens` validates a token (:class:`TokenValidator`);
* :mod:`~pgwarden.identity.claims` reads who the caller is from validated claims;
* :mod:`~pgwarden.identity.mapping` maps that identity to a role and databases by rules;
* :mod:`~pgwarden.identity.grants` holds time-bound grants added and revoked at runtime;
* :mod:`~pgwarden.identity.startup_policy` decides which startup parameters may pass;
* :mod:`~pgwarden.identity.authenticator` is the :class:`ClientAuthenticator` using them all;
* :mod:`~pgwarden.identity.connection_events` records every accepted and refused connection;
* :mod:`~pgwarden.identity.deadlines` ends sessions at token expiry or grant revocation;
* :mod:`~pgwarden.identity.role_guard` refuses SET ROLE / SET SESSION AUTHORIZATION;
* :mod:`~pgwarden.identity.admin` is the local admin socket ``pgwarden grants`` talks to;
* :mod:`~pgwarden.identity.runtime` wires them into one gateway process;
* :mod:`~pgwarden.identity.dev_issuer` is a development OIDC issuer (``pgwarden dev-issuer``).
"""
