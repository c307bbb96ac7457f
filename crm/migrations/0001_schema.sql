-- CRM schema: customers, vehicles, appointments, service history.
-- Integrity lives here: constraints, unique keys, the bay-overlap exclusion constraint and
-- the appointment status workflow trigger.

CREATE EXTENSION IF NOT EXISTS btree_gist;

-- VIN check digit (ISO 3779 / 49 CFR 565), used by a CHECK constraint.
CREATE OR REPLACE FUNCTION vin_check_digit_ok(vin text) RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT CASE WHEN vin !~ '^[A-HJ-NPR-Z0-9]{17}$' THEN false ELSE (
        SELECT CASE WHEN s % 11 = 10 THEN 'X' ELSE (s % 11)::text END = substr(vin, 9, 1)
        FROM (
            SELECT sum(
                (CASE
                    WHEN c ~ '[0-9]' THEN c::int
                    ELSE ('{"A":1,"B":2,"C":3,"D":4,"E":5,"F":6,"G":7,"H":8,"J":1,"K":2,"L":3,
                           "M":4,"N":5,"P":7,"R":9,"S":2,"T":3,"U":4,"V":5,"W":6,"X":7,"Y":8,
                           "Z":9}'::jsonb ->> c)::int
                END) * w) AS s
            FROM unnest(string_to_array(vin, NULL),
                        ARRAY[8,7,6,5,4,3,2,10,0,9,8,7,6,5,4,3,2]) AS t(c, w)
        ) sums
    ) END
$$;

CREATE OR REPLACE FUNCTION touch_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TABLE customers (
    id                           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    first_name                   text NOT NULL CHECK (length(first_name) BETWEEN 1 AND 100),
    last_name                    text NOT NULL CHECK (length(last_name) BETWEEN 1 AND 100),
    phone                        text NOT NULL UNIQUE CHECK (phone ~ '^\+[1-9][0-9]{7,14}$'),
    alt_phone                    text CHECK (alt_phone ~ '^\+[1-9][0-9]{7,14}$'),
    email                        text CHECK (email IS NULL OR email ~ '^[^@\s]+@[^@\s]+$'),
    address_line1                text,
    address_line2                text,
    city                         text,
    state                        char(2),
    zip_code                     text CHECK (zip_code ~ '^[0-9]{5}(-[0-9]{4})?$'),
    date_of_birth                date CHECK (date_of_birth > '1900-01-01'),
    preferred_language           text NOT NULL DEFAULT 'en',
    preferred_contact_method     text NOT NULL DEFAULT 'phone'
                                 CHECK (preferred_contact_method IN ('phone', 'sms', 'email')),
    call_consent                 boolean NOT NULL DEFAULT true,
    sms_consent                  boolean NOT NULL DEFAULT false,
    marketing_consent            boolean NOT NULL DEFAULT false,
    do_not_call                  boolean NOT NULL DEFAULT false,
    verification_failed_attempts integer NOT NULL DEFAULT 0
                                 CHECK (verification_failed_attempts >= 0),
    verification_locked_until    timestamptz,
    last_verified_at             timestamptz,
    customer_since               date NOT NULL DEFAULT current_date,
    time_zone                    text,
    created_at                   timestamptz NOT NULL DEFAULT now(),
    updated_at                   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX customers_alt_phone_idx ON customers (alt_phone) WHERE alt_phone IS NOT NULL;
CREATE INDEX customers_name_idx ON customers (lower(last_name), lower(first_name));
CREATE TRIGGER customers_touch BEFORE UPDATE ON customers
    FOR EACH ROW EXECUTE FUNCTION touch_updated_at();

CREATE TABLE vehicles (
    id                       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id              bigint NOT NULL REFERENCES customers (id) ON DELETE CASCADE,
    vin                      text NOT NULL UNIQUE
                             CHECK (vin ~ '^[A-HJ-NPR-Z0-9]{17}$' AND vin_check_digit_ok(vin)),
    year                     smallint NOT NULL CHECK (year BETWEEN 1980 AND 2100),
    make                     text NOT NULL,
    model                    text NOT NULL,
    trim                     text,
    engine                   text,
    colour                   text,
    plate                    text,
    current_mileage          integer CHECK (current_mileage >= 0),
    mileage_read_at          date,
    warranty_end_date        date,
    warranty_end_miles       integer CHECK (warranty_end_miles >= 0),
    last_service_date        date,
    last_service_mileage     integer CHECK (last_service_mileage >= 0),
    next_service_due_date    date,
    next_service_due_mileage integer CHECK (next_service_due_mileage >= 0),
    open_recall_codes        text[] NOT NULL DEFAULT '{}',
    created_at               timestamptz NOT NULL DEFAULT now(),
    updated_at               timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX vehicles_customer_idx ON vehicles (customer_id);
CREATE INDEX vehicles_vin_last4_idx ON vehicles (right(vin, 4));
CREATE INDEX vehicles_due_date_idx ON vehicles (next_service_due_date);
CREATE INDEX vehicles_due_mileage_idx ON vehicles (next_service_due_mileage);
CREATE TRIGGER vehicles_touch BEFORE UPDATE ON vehicles
    FOR EACH ROW EXECUTE FUNCTION touch_updated_at();

CREATE TABLE appointments (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id         bigint NOT NULL REFERENCES customers (id) ON DELETE CASCADE,
    vehicle_id          bigint NOT NULL REFERENCES vehicles (id) ON DELETE CASCADE,
    service_codes       text[] NOT NULL CHECK (cardinality(service_codes) > 0),
    status              text NOT NULL DEFAULT 'scheduled' CHECK (status IN (
                            'requested', 'scheduled', 'confirmed', 'checked_in', 'in_progress',
                            'completed', 'cancelled', 'no_show')),
    starts_at           timestamptz NOT NULL,
    ends_at             timestamptz NOT NULL,
    bay_id              text NOT NULL,
    advisor             text,
    transportation      text NOT NULL DEFAULT 'waiter'
                        CHECK (transportation IN ('waiter', 'drop_off', 'loaner', 'shuttle')),
    loaner_reserved     boolean NOT NULL DEFAULT false,
    source              text NOT NULL DEFAULT 'phone_inbound'
                        CHECK (source IN ('phone_inbound', 'phone_outbound', 'web', 'walk_in')),
    call_sid            text,
    idempotency_key     text UNIQUE,
    confirmation_code   text NOT NULL UNIQUE CHECK (confirmation_code ~ '^[A-Z0-9]{6}$'),
    confirmed_at        timestamptz,
    cancelled_at        timestamptz,
    reminded_at         timestamptz,
    cancel_reason       text,
    rescheduled_from_id bigint REFERENCES appointments (id),
    external_event_id   text,
    calendar_sync_state text NOT NULL DEFAULT 'not_required'
                        CHECK (calendar_sync_state IN ('not_required', 'pending', 'synced',
                                                       'failed')),
    calendar_sync_error text,
    notes               text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CHECK (ends_at > starts_at),
    CHECK (status <> 'cancelled' OR cancelled_at IS NOT NULL),
    CONSTRAINT appointments_no_bay_overlap EXCLUDE USING gist (
        bay_id WITH =, tstzrange(starts_at, ends_at, '[)') WITH &&
    ) WHERE (status NOT IN ('cancelled', 'no_show'))
);
CREATE INDEX appointments_customer_upcoming_idx ON appointments (customer_id, starts_at);
CREATE INDEX appointments_range_idx ON appointments (starts_at, bay_id)
    WHERE status NOT IN ('cancelled', 'no_show');
CREATE INDEX appointments_vehicle_idx ON appointments (vehicle_id);
CREATE INDEX appointments_sync_idx ON appointments (calendar_sync_state)
    WHERE calendar_sync_state IN ('pending', 'failed');
CREATE TRIGGER appointments_touch BEFORE UPDATE ON appointments
    FOR EACH ROW EXECUTE FUNCTION touch_updated_at();

-- Status workflow. Legal moves:
--   requested   -> scheduled | cancelled
--   scheduled   -> confirmed | checked_in | cancelled | no_show
--   confirmed   -> scheduled (confirmation withdrawn) | checked_in | cancelled | no_show
--   checked_in  -> in_progress | cancelled
--   in_progress -> completed
--   completed, cancelled, no_show: terminal
CREATE OR REPLACE FUNCTION appointment_status_transition_ok(old_status text, new_status text)
RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT old_status = new_status OR (old_status, new_status) IN (
        ('requested', 'scheduled'), ('requested', 'cancelled'),
        ('scheduled', 'confirmed'), ('scheduled', 'checked_in'), ('scheduled', 'cancelled'),
        ('scheduled', 'no_show'),
        ('confirmed', 'scheduled'), ('confirmed', 'checked_in'), ('confirmed', 'cancelled'),
        ('confirmed', 'no_show'),
        ('checked_in', 'in_progress'), ('checked_in', 'cancelled'),
        ('in_progress', 'completed'))
$$;

CREATE OR REPLACE FUNCTION appointments_check_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT appointment_status_transition_ok(OLD.status, NEW.status) THEN
        RAISE EXCEPTION 'illegal appointment status transition % -> %', OLD.status, NEW.status
            USING ERRCODE = 'check_violation', CONSTRAINT = 'appointments_status_transition';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER appointments_status_transition BEFORE UPDATE OF status ON appointments
    FOR EACH ROW EXECUTE FUNCTION appointments_check_transition();

CREATE TABLE service_history (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    vehicle_id         bigint NOT NULL REFERENCES vehicles (id) ON DELETE CASCADE,
    appointment_id     bigint REFERENCES appointments (id) ON DELETE SET NULL,
    service_date       date NOT NULL,
    mileage            integer CHECK (mileage >= 0),
    services_performed text[] NOT NULL CHECK (cardinality(services_performed) > 0),
    technician         text,
    advisor            text,
    labour_hours       numeric(5, 2) CHECK (labour_hours >= 0),
    parts              jsonb NOT NULL DEFAULT '[]'::jsonb,
    labour_cost        numeric(10, 2) CHECK (labour_cost >= 0),
    parts_cost         numeric(10, 2) CHECK (parts_cost >= 0),
    total_cost         numeric(10, 2) CHECK (total_cost >= 0),
    warranty           boolean NOT NULL DEFAULT false,
    notes              text,
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX service_history_vehicle_idx ON service_history (vehicle_id, service_date DESC);
