-- A session's absolute end, fixed at login (now + tokens.session_max_lifetime_secs): a refresh
-- never moves it, a refresh token's expiry is capped at it, and no refresh succeeds after it.
-- Portable SQL, like 0001. The default 0 means "already ended", so a row inserted without the
-- column fails closed; every insert sets it.
ALTER TABLE sessions ADD COLUMN absolute_expires_at BIGINT NOT NULL DEFAULT 0;

-- Sessions from before this migration end 30 days (the key's default) after their login, and
-- their current refresh token expires no later than that.
UPDATE sessions SET absolute_expires_at = created_at + 2592000000;
UPDATE sessions SET expires_at = absolute_expires_at WHERE expires_at > absolute_expires_at;
