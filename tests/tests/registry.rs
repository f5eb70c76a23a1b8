//! Every registered network: parameter counts and multiply-adds equal the papers' tables (and torchvision/timm),
//! and a forward + backward pass on a small batch gives finite outputs of the right shape.

use candle_core::{DType, Device, Tensor};
use resnet_core::{config_for, Model, Shortcut, REGISTERED};
use tests::on_one_isa;

/// Exact counts where the layout is fixed: the paper (option A CIFAR nets), torchvision, timm.
const EXACT_PARAMS: &[(&str, usize)] = &[
    ("resnet20", 269_722),
    ("resnet32", 464_154),
    ("resnet44", 658_586),
    ("resnet56", 853_018),
    ("resnet110", 1_727_962),
    ("resnet1202", 19_421_274),
    ("resnet18", 11_689_512),
    ("resnet34", 21_797_672),
    ("resnet50", 25_557_032),
    ("resnet101", 44_549_160),
    ("resnet152", 60_192_808),
    ("resnetv2_50", 25_549_352),
];

fn params(name: &str) -> usize {
    Model::by_name(name, 0, &Device::Cpu)
        .unwrap()
        .parameter_count()
}

#[test]
fn parameter_counts_equal_the_papers_tables() {
    for &(name, expected) in EXACT_PARAMS {
        assert_eq!(params(name), expected, "{name}");
    }
    // Identity Mappings: ResNet-164 1.7M, ResNet-1001 10.2M.
    let p164 = params("preact_resnet164");
    assert!(
        (1_690_000..1_710_000).contains(&p164),
        "preact_resnet164 has {p164}"
    );
    let p1001 = params("preact_resnet1001");
    assert!(
        (10_200_000..10_400_000).contains(&p1001),
        "preact_resnet1001 has {p1001}"
    );
}

#[test]
fn plain_nets_have_their_residual_twins_parameters_under_option_a() {
    for depth in [20, 32, 44, 56, 110] {
        assert_eq!(
            params(&format!("plain{depth}")),
            params(&format!("resnet{depth}")),
            "depth {depth}"
        );
    }
    for depth in [18, 34] {
        let mut twin = config_for(&format!("resnet{depth}")).unwrap();
        twin.shortcut = Shortcut::A;
        let twin = Model::new(&twin, 0, &Device::Cpu)
            .unwrap()
            .parameter_count();
        assert_eq!(params(&format!("plain{depth}")), twin, "depth {depth}");
    }
}

#[test]
fn multiply_adds_equal_the_papers_tables() {
    // torchvision layout (stride on the 3×3): 1.8 / 3.6 / 4.1 / 7.8 / 11.5 G at 224×224.
    for (name, expected_g) in [
        ("resnet18", 1.8),
        ("resnet34", 3.6),
        ("resnet50", 4.1),
        ("resnet101", 7.8),
        ("resnet152", 11.5),
    ] {
        let macs = Model::by_name(name, 0, &Device::Cpu)
            .unwrap()
            .macs((224, 224)) as f64
            / 1e9;
        let rel = (macs - expected_g).abs() / expected_g;
        assert!(
            rel < 0.03,
            "{name}: {macs:.3} GMACs, expected about {expected_g}"
        );
    }
    // Exact: torchvision ResNet-50 is 4,089,184,256 multiply-adds (fvcore / ptflops count).
    let r50 = Model::by_name("resnet50", 0, &Device::Cpu)
        .unwrap()
        .macs((224, 224));
    assert_eq!(r50, 4_089_184_256);
    // CIFAR ResNet-20: 40.55 M multiply-adds at 32×32 (the paper's 41 M).
    let r20 = Model::by_name("resnet20", 0, &Device::Cpu)
        .unwrap()
        .macs((32, 32));
    assert!((40_000_000..41_000_000).contains(&r20), "resnet20: {r20}");
}

#[test]
fn names_of_cifar_depths_and_unknown_models() {
    let c = config_for("resnet8").unwrap();
    assert_eq!(c.stage_depths, vec![1, 1, 1]);
    assert_eq!(
        config_for("preact_resnet110").unwrap().block,
        resnet_core::Block::Basic
    );
    assert_eq!(
        config_for("preact_resnet164").unwrap().stage_depths,
        vec![18, 18, 18]
    );
    assert_eq!(config_for("resnet110").unwrap().depth(), 110);
    // 50 is 6n+2: plain50 is a CIFAR net, resnet50 the ImageNet one.
    assert_eq!(
        config_for("plain50").unwrap().family,
        resnet_core::Family::Cifar
    );
    assert_eq!(
        config_for("resnet50").unwrap().family,
        resnet_core::Family::ImageNet
    );
    assert_eq!(config_for("resnet50").unwrap().depth(), 50);
    for bad in ["resnet21", "resnet", "plain21", "vgg16", "resnetv2_20"] {
        let err = config_for(bad).unwrap_err();
        assert!(
            matches!(err, resnet_core::ResNetError::UnknownModel { .. }),
            "{bad}: {err}"
        );
        assert!(err.to_string().contains(bad), "{err}");
    }
}

/// On one kernel set throughout (`on_one_isa`): a CIFAR net trains on channel blocks of the set in use, and a
/// test switching sets meanwhile made a step's later convolutions meet blocks of the other set's width.
#[test]
fn every_registered_net_runs_forward_and_backward() -> anyhow::Result<()> {
    on_one_isa(every_registered_net_steps)
}

fn every_registered_net_steps() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    for &name in REGISTERED {
        let model = Model::by_name(name, 1, &dev)?;
        let classes = model.config().num_classes;
        // ImageNet nets at 64×64 keep this fast; the architecture is fully convolutional.
        let side = match model.config().family {
            resnet_core::Family::Cifar => 32,
            resnet_core::Family::ImageNet => 64,
        };
        let x = Tensor::randn(0f32, 1.0, (2, 3, side, side), &dev)?;
        let logits = model.forward_t(&x, true)?;
        assert_eq!(logits.dims(), &[2, classes], "{name}");
        let y = Tensor::new(&[1u32, 3], &dev)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        let loss_value = loss.to_scalar::<f32>()?;
        assert!(loss_value.is_finite(), "{name}: loss {loss_value}");
        let grads = loss.backward()?;
        for (pname, var) in model.trainable_vars() {
            let g = grads
                .get(&var)
                .unwrap_or_else(|| panic!("{name}: no gradient for {pname}"));
            let finite = g
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .all(|v| v.is_finite());
            assert!(finite, "{name}: non-finite gradient in {pname}");
        }
        let eval = model.forward_t(&x, false)?;
        assert_eq!(eval.dims(), &[2, classes], "{name} (eval)");
        println!(
            "{name}: loss {loss_value:.4}, {} parameters",
            model.parameter_count()
        );
    }
    Ok(())
}

#[test]
fn every_registered_net_round_trips_through_a_weight_file() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("resnet-round-trip-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for &name in REGISTERED {
        let saved = Model::by_name(name, 1, &Device::Cpu)?;
        let path = dir.join(format!("{name}.safetensors"));
        saved.save_weights(&path, Default::default())?;
        // Another seed, then the file: every tensor, parameters and BN statistics, comes back bit for bit.
        let loaded = Model::by_name(name, 2, &Device::Cpu)?;
        loaded.load_weights(&path)?;
        let (a, b) = (saved.state_dict()?, loaded.state_dict()?);
        assert_eq!(a.len(), b.len(), "{name}");
        for (tensor, value) in &a {
            let bits = |t: &Tensor| -> anyhow::Result<Vec<u32>> {
                Ok(t.flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .map(|v| v.to_bits())
                    .collect())
            };
            assert_eq!(bits(value)?, bits(&b[tensor])?, "{name}: {tensor}");
        }
        std::fs::remove_file(&path)?;
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
