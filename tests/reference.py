"""The seed's training iteration, written out literally, as the oracle of the fast
cyclegan.train_step (tests/test_train.py)."""
import torch
import torch.nn.functional as F


def reference_step(real_A, real_B, nets, optimizers, buffers, lambda_cyc=10.0, lambda_id=5.0):
    """The seed's iteration, literally: six separate generator calls, separate
    discriminator calls on real and fake, discriminator gradients computed (and
    discarded) during the generator update, fp32, eager."""
    G_AB, G_BA, D_A, D_B = nets["G_AB"], nets["G_BA"], nets["D_A"], nets["D_B"]
    optimizer_G, optimizer_D_A, optimizer_D_B = (optimizers["optimizer_G"], optimizers["optimizer_D_A"],
                                                 optimizers["optimizer_D_B"])
    fake_A_buffer, fake_B_buffer = buffers["fake_A"], buffers["fake_B"]
    G_AB.train()
    G_BA.train()
    optimizer_G.zero_grad()
    loss_id_A = F.l1_loss(G_BA(real_A), real_A)
    loss_id_B = F.l1_loss(G_AB(real_B), real_B)
    loss_identity = (loss_id_A + loss_id_B) / 2
    fake_B = G_AB(real_A)
    pred = D_B(fake_B)
    loss_GAN_AB = F.mse_loss(pred, torch.ones_like(pred))
    fake_A = G_BA(real_B)
    pred = D_A(fake_A)
    loss_GAN_BA = F.mse_loss(pred, torch.ones_like(pred))
    loss_GAN = (loss_GAN_AB + loss_GAN_BA) / 2
    recov_A = G_BA(fake_B)
    loss_cycle_A = F.l1_loss(recov_A, real_A)
    recov_B = G_AB(fake_A)
    loss_cycle_B = F.l1_loss(recov_B, real_B)
    loss_cycle = (loss_cycle_A + loss_cycle_B) / 2
    loss_G = loss_GAN + lambda_cyc * loss_cycle + lambda_id * loss_identity
    loss_G.backward()
    optimizer_G.step()

    optimizer_D_A.zero_grad()
    pred = D_A(real_A)
    loss_real = F.mse_loss(pred, torch.ones_like(pred))
    fake_A_ = fake_A_buffer.push_and_pop(fake_A)
    pred = D_A(fake_A_.detach())
    loss_fake = F.mse_loss(pred, torch.zeros_like(pred))
    loss_D_A = (loss_real + loss_fake) / 2
    loss_D_A.backward()
    optimizer_D_A.step()

    optimizer_D_B.zero_grad()
    pred = D_B(real_B)
    loss_real = F.mse_loss(pred, torch.ones_like(pred))
    fake_B_ = fake_B_buffer.push_and_pop(fake_B)
    pred = D_B(fake_B_.detach())
    loss_fake = F.mse_loss(pred, torch.zeros_like(pred))
    loss_D_B = (loss_real + loss_fake) / 2
    loss_D_B.backward()
    optimizer_D_B.step()
    loss_D = (loss_D_A + loss_D_B) / 2
    return dict(loss_D=loss_D, loss_G=loss_G, loss_GAN=loss_GAN, loss_cycle=loss_cycle, loss_identity=loss_identity,
                loss_D_A=loss_D_A, loss_D_B=loss_D_B)

