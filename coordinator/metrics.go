package coordinator

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	leader           prometheus.Gauge
	pending          prometheus.Gauge
	placements       prometheus.Counter
	conflicts        prometheus.Counter
	batchRetries     prometheus.Counter
	placementSeconds prometheus.Histogram
	roundSeconds     prometheus.Histogram
	rounds           *prometheus.CounterVec
	fullRounds       *prometheus.CounterVec
	decideSeconds    *prometheus.HistogramVec
	nodesLost        prometheus.Counter
	fenceFailures    prometheus.Counter
	moves            prometheus.Counter
	migrations       *prometheus.CounterVec
	migrationSeconds prometheus.Histogram
	volumeSeconds    prometheus.Histogram
	rolloutNodes     *prometheus.GaugeVec
	leaseQuestions   *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		leader: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "herd_coordinator_leader", Help: "1 while this replica is the leader.",
		}),
		pending: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "herd_coordinator_pending_vms", Help: "Valid VMs that fit on no node at the last round.",
		}),
		placements: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "herd_coordinator_placements_total", Help: "First placements committed.",
		}),
		batchRetries: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "herd_coordinator_batch_retries_total", Help: "Batches of leader writes retried one action at a time because one of them conflicted.",
		}),
		conflicts: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "herd_coordinator_txn_conflicts_total", Help: "Leader writes refused because the object changed since it was read.",
		}),
		placementSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "herd_coordinator_placement_seconds", Help: "From a new spec seen to its placement committed.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2.5, 14),
		}),
		roundSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "herd_coordinator_round_seconds", Help: "One scheduling round, from snapshot to commit.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2.5, 14),
		}),
		rounds: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "herd_coordinator_rounds_total", Help: "Rounds the leader ran, by kind: full (every VM and node) or quick (only the VMs that changed, and the unplaced).",
		}, []string{"kind"}),
		fullRounds: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "herd_coordinator_full_round_causes_total", Help: "Why rounds were full: due (the interval, or a timer a round set), a quick round's VM only a full round decides (vm), a restore recovery (recovery), or the keyspace prefix that changed (nodes, fences, ...; work: side work ended).",
		}, []string{"cause"}),
		decideSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "herd_coordinator_decide_seconds", Help: "One round's observe and decide (before any write), by kind.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2.5, 14),
		}, []string{"kind"}),
		nodesLost: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "herd_coordinator_nodes_lost_total", Help: "Fence records committed: node boots declared dead.",
		}),
		fenceFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "herd_coordinator_fence_failures_total", Help: "Fencer runs that failed (retried with backoff).",
		}),
		moves: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "herd_coordinator_vm_moves_total", Help: "VMs placed elsewhere after their node was fenced.",
		}),
		migrations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "herd_coordinator_migrations_total", Help: "Migrations by outcome: started, done, failed.",
		}, []string{"outcome"}),
		migrationSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "herd_coordinator_migration_seconds", Help: "From opening a migration to committing it.",
			Buckets: prometheus.ExponentialBuckets(0.5, 2, 10),
		}),
	}
	m.volumeSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "herd_coordinator_volume_seconds", Help: "Creating, cloning or growing one disk.",
		Buckets: prometheus.ExponentialBuckets(0.01, 2.5, 10),
	})
	m.rolloutNodes = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "herd_coordinator_rollout_nodes", Help: "Nodes of the rollout under way by phase (leader only; none when no rollout runs).",
	}, []string{"phase"})
	m.leaseQuestions = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "herd_coordinator_lease_questions_total",
		Help: "TimeToLive requests by who asked: warm (every replica, as node keys appear), round (the leader, for what it did not know yet) or events (the audit-trail janitor).",
	}, []string{"by"})
	reg.MustRegister(m.leaseQuestions)
	reg.MustRegister(m.migrations, m.migrationSeconds, m.volumeSeconds, m.rolloutNodes)
	reg.MustRegister(m.leader, m.pending, m.placements, m.conflicts, m.batchRetries, m.placementSeconds, m.roundSeconds, m.rounds, m.fullRounds, m.decideSeconds, m.nodesLost, m.fenceFailures, m.moves)
	return m
}
