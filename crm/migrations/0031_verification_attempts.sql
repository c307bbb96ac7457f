-- Verification attempts counted in Postgres, the single source of truth.
--
-- Each verification comparison (one verify_customer call that checks given factors) first
-- claims a slot with ONE UPDATE statement: it appends now() to verification_attempts only
-- when fewer than 3 attempts are younger than 15 minutes and no lock is in force. Postgres
-- serialises concurrent UPDATEs of the row and re-checks the WHERE clause against the row
-- a concurrent session just wrote, so 50 parallel calls get at most 3 comparisons between
-- them. The CHECK below keeps that bound in the table itself.
--
-- verification_failed_attempts counts failed comparisons in a run (each within 15 minutes
-- of the previous failure, verification_last_failed_at); the third sets
-- verification_locked_until. A success never resets them: it may be another caller's.

ALTER TABLE customers
    ADD COLUMN IF NOT EXISTS verification_attempts timestamptz[] NOT NULL DEFAULT '{}',
    ADD COLUMN IF NOT EXISTS verification_last_failed_at timestamptz;

ALTER TABLE customers DROP CONSTRAINT IF EXISTS customers_verification_attempts_max;
ALTER TABLE customers ADD CONSTRAINT customers_verification_attempts_max
    CHECK (cardinality(verification_attempts) <= 3);

-- The attempts in ``attempts`` later than ``since``, oldest first.
CREATE OR REPLACE FUNCTION verification_attempts_since(attempts timestamptz[], since timestamptz)
RETURNS timestamptz[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(array_agg(t ORDER BY t), '{}') FROM unnest(attempts) AS t WHERE t > since
$$;
