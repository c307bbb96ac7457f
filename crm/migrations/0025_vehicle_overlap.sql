-- One vehicle cannot be in two places at once, and a replayed booking never answers with a
-- dead row.
--
-- 1. appointments_no_vehicle_overlap: like appointments_no_bay_overlap, no two ACTIVE
--    appointments (any status but cancelled / no_show, the same predicate as the bay
--    constraint) of one vehicle may overlap in time, whatever their bays.
-- 2. The idempotency key is unique among live appointments only, so a booking whose first
--    row was cancelled (rescheduled away, cancelled by the caller) can be made again with
--    the same key instead of returning the cancelled row.
--
-- Existing overlaps: nothing is cancelled automatically. Which of two overlapping bookings
-- the customer expects is a business decision (both were confirmed to someone with a code),
-- so when any exist the migration stops with an error naming how many pairs there are and
-- which appointment ids, before anything is changed. The migration runner applies this
-- file in one transaction, so the database stays exactly at the previous migration; the
-- app refuses to start with that message until staff cancel or move one appointment of each
-- pair (SQL in the README, "Upgrading to migration 0025").

-- No booking may slip in between the check and the constraint.
LOCK TABLE appointments IN SHARE ROW EXCLUSIVE MODE;

DO $$
DECLARE
    pairs bigint;
    examples text;
BEGIN
    SELECT count(*),
           string_agg(format('%s/%s', a_id, b_id), ', ' ORDER BY a_id, b_id)
               FILTER (WHERE rn <= 20)
      INTO pairs, examples
      FROM (
          SELECT a.id AS a_id, b.id AS b_id, row_number() OVER (ORDER BY a.id, b.id) AS rn
            FROM appointments a
            JOIN appointments b
              ON b.vehicle_id = a.vehicle_id AND a.id < b.id
             AND tstzrange(a.starts_at, a.ends_at, '[)') && tstzrange(b.starts_at, b.ends_at, '[)')
           WHERE a.status NOT IN ('cancelled', 'no_show')
             AND b.status NOT IN ('cancelled', 'no_show')
      ) p;
    IF pairs > 0 THEN
        RAISE EXCEPTION 'migration 0025_vehicle_overlap: % pair(s) of active appointments of the same vehicle overlap in time (first pairs of appointment ids: %)', pairs, examples
            USING ERRCODE = 'exclusion_violation',
                  CONSTRAINT = 'appointments_no_vehicle_overlap',
                  HINT = 'Nothing was changed. Cancel or move one appointment of each pair '
                         '(UPDATE appointments SET status = ''cancelled'', cancelled_at = now(), '
                         'cancel_reason = ''duplicate booking'' WHERE id = ...), then restart.';
    END IF;
END
$$;

ALTER TABLE appointments ADD CONSTRAINT appointments_no_vehicle_overlap EXCLUDE USING gist (
    vehicle_id WITH =, tstzrange(starts_at, ends_at, '[)') WITH &&
) WHERE (status NOT IN ('cancelled', 'no_show'));

ALTER TABLE appointments DROP CONSTRAINT appointments_idempotency_key_key;
CREATE UNIQUE INDEX appointments_live_idempotency_key ON appointments (idempotency_key)
    WHERE status NOT IN ('cancelled', 'no_show');
