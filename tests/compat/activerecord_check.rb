#!/usr/bin/env ruby
# frozen_string_literal: true

# Compatibility driver for ActiveRecord (Rails, postgresql adapter on ruby-pg; Debian's packages)
# against rlsgate (run by tests/compat.rs via run.sh).
#
# One connection pool per tenant (the token is the password; pool 3) shared by COMPAT_CLIENTS/2
# threads, so the adapter's connections move between threads while rlsgate moves their
# transactions between its server connections. Everything runs twice: with prepared_statements
# true (the adapter's default: named server statements a1, a2, ...) and false. At connect the
# adapter sends SET client_min_messages, SET standard_conforming_strings = on,
# SET intervalstyle = iso_8601 and SET SESSION timezone TO 'UTC'.
# Features: isolation, prepared, session_settings, error_in_transaction.
# Environment and output as in README.md (one JSON line per feature on stdout).

require "json"
require "securerandom"

DRIVER = "activerecord"
FEATURES = %w[isolation prepared session_settings error_in_transaction].freeze
EXPECTED = { "north" => 3, "south" => 2 }.freeze
IDS = { "north" => [1, 2, 3], "south" => [4, 5] }.freeze
RUNS = 20

def fail_early(msg)
  warn "#{DRIVER}: #{msg}"
  exit 2
end

def env(name, default = nil)
  v = ENV[name]
  v = default if v.nil? || v.empty?
  fail_early("environment variable #{name} is not set") if v.nil? || v.empty?
  v
end

begin
  require "active_record"
  require "pg"
rescue LoadError => e
  fail_early("cannot load ActiveRecord/pg (#{e.message}); run tests/compat/install.sh")
end

PGHOST = env("PGHOST", "127.0.0.1")
PGPORT = env("PGPORT").to_i
PGDATABASE = env("PGDATABASE")
PGUSER = env("PGUSER", "app")
PGSSLMODE = env("PGSSLMODE", "disable")
TOKENS = { "north" => env("TOKEN_NORTH"), "south" => env("TOKEN_SOUTH") }.freeze
USERS = {
  "north" => ENV["COMPAT_USER_NORTH"].to_s.empty? ? PGUSER : ENV["COMPAT_USER_NORTH"],
  "south" => ENV["COMPAT_USER_SOUTH"].to_s.empty? ? PGUSER : ENV["COMPAT_USER_SOUTH"]
}.freeze
CLIENTS = (ENV["COMPAT_CLIENTS"] || "10").to_i
DEADLINE = (ENV["COMPAT_DEADLINE"] || "50").to_f
START = Process.clock_gettime(Process::CLOCK_MONOTONIC)

# Per-feature outcomes from every thread.
class Results
  def initialize
    @lock = Mutex.new
    @items = Hash.new { |h, k| h[k] = [] }
  end

  def add(feature, who, ok, detail)
    @lock.synchronize { @items[feature] << [who, ok, detail.to_s] }
  end

  def summary(feature, expected)
    items = @lock.synchronize { @items[feature].dup }
    failed = items.reject { |_, ok, _| ok }
    unless failed.empty?
      text = failed.first(3).map { |who, _, d| "#{who}: #{d}" }.join("; ")
      more = failed.size > 3 ? " (+#{failed.size - 3} more)" : ""
      return [false, "#{failed.size}/#{items.size} failed: #{text}#{more}"[0, 600]]
    end
    if items.size < expected
      return [false, "only #{items.size} of #{expected} threads finished this before the deadline of #{DEADLINE}s"]
    end
    if feature == "isolation"
      total = items.sum { |_, _, d| d.split.first.to_i }
      return [true, "#{items.size} threads, #{total} tenant checks: each saw only its own tenant (north 3 customers, south 2)"]
    end
    details = items.map { |_, _, d| d }.uniq.sort
    [true, "#{items.size}/#{items.size} ok: #{details.first(3).join('; ')}"[0, 600]]
  end
end

RESULTS = Results.new

class Rollback < StandardError; end

def sqlstate(exc)
  cause = exc.respond_to?(:cause) ? exc.cause : nil
  cause.respond_to?(:result) && cause.result ? cause.result.error_field(PG::Result::PG_DIAG_SQLSTATE) : nil
end

def describe(exc)
  code = sqlstate(exc)
  msg = exc.message.to_s.lines.first.to_s.strip
  code ? "#{exc.class} #{code}: #{msg}" : "#{exc.class}: #{msg}"
end

# An abstract base class with its own pool per tenant and mode, and a Customer model on it.
def models(tenant, prepared)
  suffix = "#{tenant.capitalize}#{prepared ? 'Prepared' : 'Unprepared'}"
  base = Class.new(ActiveRecord::Base) { self.abstract_class = true }
  Object.const_set("#{suffix}Record", base)
  base.establish_connection(
    adapter: "postgresql", host: PGHOST, port: PGPORT, database: PGDATABASE,
    username: USERS[tenant], password: TOKENS[tenant], sslmode: PGSSLMODE, connect_timeout: 10,
    pool: 3, checkout_timeout: 30, prepared_statements: prepared
  )
  customer = Class.new(base) do
    self.table_name = "customers"
    self.primary_key = "customer_id"
  end
  Object.const_set("#{suffix}Customer", customer)
  customer
end

def tenant_problem(model, tenant, where)
  n = model.count
  stores = model.distinct.order(:store_id).pluck(:store_id)
  ids = model.order(:customer_id).pluck(:customer_id)
  other = model.find_by(customer_id: tenant == "north" ? 4 : 1)
  own = model.find(IDS[tenant].first)
  return nil if n == EXPECTED[tenant] && stores == [tenant] && ids == IDS[tenant] && other.nil? && own.store_id == tenant

  "#{where}: saw #{n} customers #{ids} of stores #{stores}, other tenant's customer #{other ? 'visible' : 'hidden'}"
end

# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------

def do_prepared(model, tenant, prepared)
  named = 0
  RUNS.times do |k|
    v = k % 7
    want = IDS[tenant].count { |i| i <= v }
    got = nil
    model.connection_pool.with_connection do |conn|
      if k % 5 == 4
        model.transaction do
          got = model.where(customer_id: ..v).count
          raise ActiveRecord::Rollback if k % 10 == 9
        end
      else
        got = model.where(customer_id: ..v).count
      end
      named = [named, conn.instance_variable_get(:@statements).length].max
    end
    raise Rollback, "run #{k}: count for id <= #{v} is #{got}, expected #{want}" unless got == want
  end
  if prepared
    raise Rollback, "the adapter prepared no named statement" unless named.positive?

    "prepared_statements: true: #{RUNS} pooled executions of named server statements correct (some in committed, some in rolled-back transactions)"
  else
    raise Rollback, "#{named} named statements although prepared_statements is false" unless named.zero?

    "prepared_statements: false: #{RUNS} pooled executions (unnamed statements) correct"
  end
end

def do_session_settings(model, _tenant, prepared)
  want = { "client_min_messages" => "warning", "standard_conforming_strings" => "on",
           "intervalstyle" => "iso_8601", "TimeZone" => "UTC" }
  3.times do |round|
    model.connection_pool.with_connection do |conn|
      want.each do |name, value|
        got = conn.select_value("SHOW #{name}")
        raise Rollback, "round #{round}: SHOW #{name} = #{got}, expected #{value}" unless got == value
        model.count # another transaction in between
      end
      iv = conn.select_value("SELECT interval '1 day 2 hours'")
      raise Rollback, "round #{round}: interval read as #{iv.inspect}, expected ISO 8601" unless iv == "P1DT2H"
      s = conn.select_value("SELECT 'a\\b'::text")
      raise Rollback, "round #{round}: 'a\\b' read as #{s.inspect} (standard_conforming_strings)" unless s == "a\\b"
    end
  end
  "#{prepared ? 'prepared' : 'unprepared'}: the adapter's connect-time SETs (client_min_messages, standard_conforming_strings, intervalstyle, timezone) hold in later transactions"
end

def do_error_in_transaction(model, tenant, _prepared)
  before = model.count
  model.transaction do
    model.create!(store_id: tenant, name: "ActiveRecord rollback", email: "ar-#{SecureRandom.hex(6)}@#{tenant}.example")
    inside = model.count
    raise Rollback, "inside the transaction the new row is not visible (#{inside})" unless inside == before + 1

    begin
      model.connection.execute("SELECT 1/0")
      raise Rollback, "SELECT 1/0 did not fail"
    rescue ActiveRecord::StatementInvalid => e
      raise Rollback, "SELECT 1/0: #{describe(e)}" unless sqlstate(e) == "22012"
    end
    begin
      model.count
      raise Rollback, "statement after the error did not fail"
    rescue ActiveRecord::StatementInvalid => e
      raise Rollback, "after the error: #{describe(e)}" unless sqlstate(e) == "25P02"
    end
    raise ActiveRecord::Rollback
  end
  after = model.count
  raise Rollback, "after the rolled-back transaction #{after} customers, expected #{before}" unless after == before

  # An exception leaving the block rolls back too.
  begin
    model.transaction do
      model.create!(store_id: tenant, name: "ActiveRecord rollback 2", email: "ar-#{SecureRandom.hex(6)}@#{tenant}.example")
      model.connection.execute("SELECT 1/0")
    end
    raise Rollback, "the failing transaction block did not raise"
  rescue ActiveRecord::StatementInvalid => e
    raise Rollback, "failing block: #{describe(e)}" unless sqlstate(e) == "22012"
  end
  after = model.count
  raise Rollback, "after the failed transaction #{after} customers, expected #{before}" unless after == before

  "transaction: insert, 22012, 25P02, ActiveRecord::Rollback; a block raising 22012: writes undone"
end

# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def worker(i, models_by_tenant, prepared, merged)
  tenant = i.even? ? "north" : "south"
  who = "thread #{i} (#{tenant}, prepared_statements: #{prepared})"
  model = models_by_tenant[tenant]
  checks = 0
  problems = []
  iso = lambda do |where|
    checks += 1
    begin
      p = model.connection_pool.with_connection { tenant_problem(model, tenant, where) }
    rescue StandardError => e
      p = "#{where}: #{describe(e)}"
    end
    problems << p if p
  end
  iso.call("at the start")
  [%w[session_settings do_session_settings], %w[prepared do_prepared],
   %w[error_in_transaction do_error_in_transaction]].each do |feature, fn|
    begin
      detail = model.connection_pool.with_connection { send(fn, model, tenant, prepared) }
      merged.add(feature, who, true, detail)
    rescue StandardError => e
      merged.add(feature, who, false, e.is_a?(Rollback) ? e.message : describe(e))
    end
    iso.call("after #{feature}")
  end
  if problems.empty?
    merged.add("isolation", who, true, "#{checks} checks")
  else
    merged.add("isolation", who, false, "#{problems.size}/#{checks} checks wrong, first: #{problems.first}")
  end
end

def remaining
  DEADLINE - (Process.clock_gettime(Process::CLOCK_MONOTONIC) - START)
end

def main
  ActiveRecord::Base.logger = nil
  by_mode = [true, false].to_h do |prepared|
    [prepared, %w[north south].to_h { |t| [t, models(t, prepared)] }]
  end
  begin
    by_mode[true]["north"].connection_pool.with_connection { |c| c.select_value("SELECT 1") }
  rescue StandardError => e
    fail_early("cannot connect to #{PGHOST}:#{PGPORT}/#{PGDATABASE}: #{describe(e)}")
  end
  threads = []
  by_mode.each do |prepared, ms|
    threads += Array.new(CLIENTS) { |i| Thread.new { worker(i, ms, prepared, RESULTS) } }
  end
  timed_out = false
  threads.each do |t|
    timed_out = true if t.join([remaining, 0].max).nil?
  end
  FEATURES.each do |f|
    ok, detail = RESULTS.summary(f, 2 * CLIENTS)
    puts JSON.generate({ driver: DRIVER, feature: f, ok: ok, detail: detail })
  end
  $stdout.flush
  if timed_out
    warn "#{DRIVER}: deadline of #{DEADLINE}s reached, unfinished work abandoned"
    exit!(0)
  end
  ActiveRecord::Base.connection_handler.clear_all_connections!
end

main
